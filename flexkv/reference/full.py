"""Reference `full`: keep every token."""
from flexkv.reference import register_reference
from flexkv.reference.engine import RefPolicy


@register_reference("full")
class RefFull(RefPolicy):
    pass

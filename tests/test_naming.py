"""How the library names parameters and groups (``lightning_nodecay._naming``)."""

import pytest

from lightning_nodecay._naming import clean_name


@pytest.mark.parametrize(
    ("name", "cleaned"),
    [
        ("layers._fsdp_wrapped_module.0.weight", "layers.0.weight"),
        ("_checkpoint_wrapped_module.norm.bias", "norm.bias"),
        ("backbone._orig_mod.conv.weight", "backbone.conv.weight"),
        ("a._fsdp_wrapped_module._checkpoint_wrapped_module.b", "a.b"),
        ("my_wrapped_module_x.weight", "my_wrapped_module_x.weight"),
    ],
)
def test_clean_name_removes_wrapper_segments(name, cleaned):
    """Test that only whole wrapper segments are removed."""
    assert clean_name(name) == cleaned

"""Registry: lazy "module:attr" entries, name rules, did-you-mean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffunlearn.registry import Registry, UnknownNameError


def make_registry() -> Registry:
    reg: Registry = Registry("method")
    reg.add("esd-x", "json:dumps", help="dumps JSON")
    reg.add("uce", "json:loads")
    reg.add("salun", "collections:OrderedDict")
    return reg


def test_get_resolves_module_attr():
    import collections
    import json

    reg = make_registry()
    assert reg.get("esd-x") is json.dumps
    assert reg.get("salun") is collections.OrderedDict
    assert reg.get("esd-x") is reg.get("esd-x")  # cached


def test_names_sorted_contains_iter_help():
    reg = make_registry()
    assert reg.names() == ["esd-x", "salun", "uce"]
    assert list(reg) == ["esd-x", "salun", "uce"]
    assert "uce" in reg and "nope" not in reg
    assert reg.help("esd-x") == "dumps JSON"
    assert reg.help("uce") == ""


def test_duplicate_name_is_an_error():
    reg = make_registry()
    with pytest.raises(ValueError, match="duplicate method name 'uce'"):
        reg.add("uce", "json:dumps")
    assert reg.get("uce").__name__ == "loads"  # the first registration is kept


@pytest.mark.parametrize("bad", ["ESD", "esd_x", "esd x", "Uce-2"])
def test_names_must_be_lowercase_with_dashes(bad):
    reg: Registry = Registry("method")
    with pytest.raises(ValueError, match="lowercase-with-dashes"):
        reg.add(bad, "json:dumps")
    assert reg.names() == []


def test_target_must_be_module_attr():
    reg: Registry = Registry("method")
    with pytest.raises(ValueError, match="module:attr"):
        reg.add("esd", "json.dumps")
    assert "esd" not in reg


def test_unknown_name_did_you_mean_and_choices():
    reg = make_registry()
    with pytest.raises(UnknownNameError) as info:
        reg.get("esd-y")
    msg = str(info.value)
    assert msg == "unknown method 'esd-y' (did you mean 'esd-x'?); valid methods: esd-x, salun, uce"
    assert "\n" not in msg
    assert isinstance(info.value, KeyError)  # callers may catch KeyError


def test_unknown_name_without_close_match_lists_choices():
    reg = make_registry()
    with pytest.raises(UnknownNameError) as info:
        reg.check("zzzzzzzz")
    msg = str(info.value)
    assert "did you mean" not in msg
    assert msg.endswith("valid methods: esd-x, salun, uce")
    with pytest.raises(UnknownNameError):
        reg.help("zzzzzzzz")


def test_check_and_listing_do_not_import():
    """Listing and validating names never imports the target module."""
    code = (
        "import sys\n"
        "from diffunlearn.registry import Registry\n"
        "r = Registry('thing')\n"
        "r.add('a', 'diffunlearn_no_such_module_xyz:f')\n"
        "r.add('wav', 'wave:open')\n"
        "assert r.check('a') == 'a' and r.names() == ['a', 'wav']\n"
        "assert 'wave' not in sys.modules\n"
        "r.get('wav')\n"
        "assert 'wave' in sys.modules\n"
        "try:\n"
        "    r.get('a')\n"
        "except ModuleNotFoundError:\n"
        "    print('lazy-ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy-ok"

"""The references hold to the code: docs/configuration.md is the one the schemas generate (a key, range, default or
description changed in distributed_ebm/config/ without regenerating it fails here), and docs/design.md's package
listing names every module."""
from distributed_ebm.config.reference import reference

from .conftest import REPO


def test_the_committed_configuration_reference_is_the_generated_one(monkeypatch):
    monkeypatch.chdir(REPO)  # defaults that are relative paths are shown relative to the repository
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == reference(), ("docs/configuration.md is out of date: regenerate it with "
                                 "`python -m distributed_ebm.config.reference > docs/configuration.md`")


def test_every_setting_of_every_job_is_in_the_reference():
    from distributed_ebm.config import AttackConfig, TrainEBMConfig

    page = (REPO / "docs" / "configuration.md").read_text()
    for key in ("attack.eot_defense", "attack.restarts", "purify.steps", "precision", "ray.max_failures"):
        assert f"| `{key}` |" in page, key
    assert set(AttackConfig.model_fields) | set(TrainEBMConfig.model_fields) <= {
        line.split("`")[1].split(".")[0] for line in page.splitlines() if line.startswith("| `")}


def test_the_folders_the_device_scripts_fill_are_in_gitignore():
    """Ray's working-dir upload (`ray job submit --working-dir .`) skips what .gitignore names, not what
    .git/info/exclude names: a prepared .device-ray (hundreds of MB) left out of .gitignore would go up with every
    submission from the checkout and make it fail."""
    from pathlib import Path
    ignored = Path(".gitignore").read_text().splitlines()
    for script, folder in (("benchmarks/device/prepare_device.sh", "/.device/"),
                           ("benchmarks/device/prepare_device_ray.sh", "/.device-ray/")):
        assert folder in ignored, folder
        assert "info/exclude" not in Path(script).read_text(), script


def test_the_design_notes_list_every_module_of_the_package():
    """docs/design.md's package listing names every module in its folder's entry (a module added without a line
    there fails here)."""
    import re

    page = (REPO / "docs" / "design.md").read_text()
    listing = page.split("    distributed_ebm/\n", 1)[1].split("\nAround it:", 1)[0]
    entries, name = {}, None
    for line in listing.splitlines():
        head = re.match(r"      (\S+)\s", line + " ")
        if head:
            name = head.group(1)
        entries[name] = entries.get(name, "") + line
    package = REPO / "distributed_ebm"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        parts = path.relative_to(package).parts
        entry = entries.get(parts[0] if len(parts) == 1 else parts[0] + "/", "")
        if not re.search(rf"(?<![\w/]){re.escape(path.name)}", entry):
            missing.append("/".join(parts))
    assert not missing, f"docs/design.md's package listing lacks {missing}"

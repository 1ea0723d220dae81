"""The root command: version, help, lazy subcommands, and a clear error for a bad config."""

from click.testing import CliRunner

from splitvmm import __version__
from splitvmm.cli import SUBCOMMANDS, cli


def test_cli_version_prints_package_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert (result.exit_code, result.output) == (0, f"splitvmm, version {__version__}\n")


def test_cli_help_lists_every_subcommand():
    result = CliRunner().invoke(cli, ["--help"])
    assert all(f"  {name} " in result.output for name in SUBCOMMANDS)


def test_cli_up_missing_config_exits_1_naming_file(tmp_path):
    result = CliRunner().invoke(cli, ["up", str(tmp_path / "absent.toml")])
    assert result.exit_code == 1
    assert "absent.toml: cannot read the config" in result.output

"""``trio-runtime doctor --data-dir DIR`` checks each MCP server of ``DIR/mcp.json``: started, tools listed,
stopped; a server that cannot start is a FAIL naming why, and the exit code is 1. Bounded by each server's
``startup_timeout`` (the doctor runs its own trio loop, so this test is synchronous)."""

from __future__ import annotations

import io
import json

from web.cli import main
from web.doctor import run_doctor

from .test_mcp_runtime import SECRET, children, entry, write_file


def test_doctor_checks_every_configured_server(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    write_file(tmp_path, {"box": entry(marks), "off": {**entry(marks), "enabled": False},
                          "bad": {"command": str(tmp_path / "missing-program"), "env": {"KEY": SECRET},
                                  "startup_timeout": 5}})
    before = children()
    out = io.StringIO()
    code = run_doctor(model="scripted", data_dir=tmp_path, out=out)
    report = out.getvalue()
    assert code == 1
    lines = report.splitlines()
    assert "  ok    MCP server 'box': started (stdio), 9 tools" in lines
    assert "  ok    MCP server 'off': disabled (not started)" in lines
    bad = next(line for line in lines if "MCP server 'bad'" in line)
    assert bad.startswith("  FAIL  MCP server 'bad': No such file or directory")
    assert lines[-1] == "1 problem found." and SECRET not in report
    assert children() - before == set()


def test_doctor_without_mcp_json_checks_only_the_model(tmp_path, capsys):
    assert main(["doctor", "--data-dir", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "MCP" not in report and report.strip().endswith("All checks passed.")
    assert not (tmp_path / "mcp.json").exists()


def test_doctor_reports_an_invalid_mcp_json(tmp_path):
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"x": {"command": "a", "url": "http://b"}}}))
    out = io.StringIO()
    assert run_doctor(model="scripted", data_dir=tmp_path, out=out) == 1
    assert "FAIL  mcp.json: " in out.getvalue() and "not both or neither" in out.getvalue()

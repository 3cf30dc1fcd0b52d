"""Tools from MCP servers (API.md "Tools from MCP servers"): ``config`` (the ``mcp.json`` file) and
``supervisor`` (the servers as supervised tasks, and the registry that offers their tools)."""

from .config import ServerConfig
from .supervisor import McpServers, McpTool, RuntimeTools

__all__ = ["McpServers", "McpTool", "RuntimeTools", "ServerConfig"]

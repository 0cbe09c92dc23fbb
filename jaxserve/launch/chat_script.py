"""The scripted multi-turn "chat" both demos replay: a shared module docstring (the system prompt), a
per-session header, and one code-completion turn after another.

Sized so three turns with 28 new tokens each stay within 256 tokens: the demo model was trained on
256-byte windows and has never seen later positions."""

SYSTEM = '"""Helpers for reading configuration files."""\n\nimport os\n\n\n'
TURNS = [
    "def read_config(path):\n",
    "class Report:\n    def __init__(self, ",
    "def main():\n    ",
]
USERS = ["", "# Copyright the authors.\n", "import sys\n"]

"""The scripted multi-turn "chat" both demos replay: a shared module docstring (the system prompt), a
per-session header, and one code-completion turn after another."""

SYSTEM = ('"""A small utility module.\n\nThis module provides helpers for reading configuration files,\n'
          'parsing command line arguments and formatting reports."""\n\nimport os\nimport sys\n\n\n')
TURNS = [
    "def read_config(path):\n    \"\"\"Return the parsed configuration stored at *path*.\"\"\"\n",
    "class Report:\n    \"\"\"A formatted report.\"\"\"\n\n    def __init__(self, title",
    "    def format(self, width=80):\n",
    "def main(argv=None):\n    ",
]
USERS = ["", "# Copyright the authors.\n", "from collections import defaultdict\n"]

"""Chat templates for the OpenAI front: found beside the model (`chat_template.jinja`, else
tokenizer_config.json's `chat_template`) or given, rendered with jinja2 in a sandbox as Hugging Face does;
without one, the plain template (one line "<role>: <content>\\n" per message, then "assistant:")."""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

from jaxserve.scheduler.http_requests import bad_request


def load_template(folder: Path | None, override: str | None) -> str | None:
    if override:
        path = Path(override)
        with contextlib.suppress(OSError):
            if path.is_file():
                return path.read_text()
        return override
    if folder is None:
        return None
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        template = json.loads(config_file.read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template:
            return template
    return None


def special_token(folder: Path | None, key: str) -> str:
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return ""
    token = json.loads((folder / "tokenizer_config.json").read_text()).get(key)
    content = token.get("content") if isinstance(token, dict) else token
    return content if isinstance(content, str) else ""


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = None
        if source is not None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": False}
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._compiled = env.from_string(source)

    @property
    def is_plain(self) -> bool:
        return self._compiled is None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, /, **extra) -> str:
        if self._compiled is None:
            text = "".join(f"{m['role']}: {m['content'] or ''}\n" for m in messages)
            return text + ("assistant:" if add_generation_prompt else "")
        from jinja2.exceptions import TemplateError
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError as e:
            raise bad_request(f"The chat template could not render these messages: {e}", "messages") from None


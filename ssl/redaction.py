"""Keep secrets (a wandb API key, tokens, passwords) out of everything a run writes.

A run records its config in three places: <run_dir>/config.yaml, the logger's hyperparameters
(CSV hparams.yaml, wandb's config) and every checkpoint (`hyper_parameters`). A key passed as
`+logger.api_key=...` would land in all three, and wandb also records the command line. Values
under secret-looking names are written as "***" instead; the live config keeps the real value, so
the run can still use it. Environment variables are never dumped.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REDACTED = "***"

# api_key, wandb_api_key, access_key, private_key, secret, client_secret, password, passwd,
# credentials; and tokens that are credentials (token, auth_token, hf_token) but not model parts
# (class_token, mask_token, reg_tokens are timm / objective settings).
_SECRET = re.compile(r"api[_-]?key|access[_-]?key|private[_-]?key|secret|passw(or)?d|credential", re.I)
_TOKEN = re.compile(
    r"^((auth|access|api|bearer|refresh|session|id|hf|github|gh|wandb)[_-]?)?tokens?$", re.I
)


def is_secret_name(name: str) -> bool:
    """Whether a config key's name says its value is a credential."""
    return bool(_SECRET.search(name) or _TOKEN.match(name))


def redact(value: Any) -> Any:
    """A copy of nested dicts / lists with every secret-named entry's value replaced by "***".

    Empty values (None, "") stay as they are: nothing is hidden, and the dump shows it is unset.
    """
    if isinstance(value, dict):
        return {
            k: (REDACTED if is_secret_name(str(k)) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def redact_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides with secret values hidden: `+logger.api_key=abc` -> `+logger.api_key=***`.

    Applied to sys.argv once Hydra has composed the config, before wandb records the command line.
    """
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        out.append(f"{key}={REDACTED}" if sep and not key.startswith("-") and is_secret_name(name) else arg)
    return out


# key=value; the value runs to whitespace, a quote or bracket, or a comma before the next key=
# (Hydra's override_dirname joins overrides with commas; a sweep's "a,b" values stay together).
_ASSIGNMENT = re.compile(
    r"(?P<key>[\w.+~-]*?(?P<name>[A-Za-z0-9_-]+))=(?P<value>(?:[^\s,'\"\]\)]|,(?![\w.+~-]+=))+)"
)


def redact_text(text: str) -> str:
    """Free text (a log line) with `name=value` secret assignments hidden."""
    def hide(match: re.Match) -> str:
        return f"{match['key']}={REDACTED}" if is_secret_name(match["name"]) else match[0]

    return _ASSIGNMENT.sub(hide, text)


class RedactingFilter(logging.Filter):
    """Logging filter hiding secret overrides, e.g. in Hydra's multirun launcher's job list.

    conf/config.yaml puts it on Hydra's console handler.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact_text(message)
        if hidden != message:
            record.msg, record.args = hidden, ()
        return True


def redact_yaml_file(path: Path) -> None:
    """Rewrite a config dump someone else wrote (Hydra's <sweep dir>/multirun.yaml) without secrets.

    Interpolations are kept as written; the overrides Hydra records there are redacted too.
    """
    if not path.is_file():
        return
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    hidden = _redact_strings(redact(cfg))
    if hidden == cfg:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(OmegaConf.to_yaml(hidden))
    os.replace(tmp, path)  # atomic: parallel jobs of one sweep may all do this


def _redact_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value

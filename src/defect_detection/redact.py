"""Credentials never leave the process: a URI's `user:password@` and token-like query values are
masked wherever a URI is logged, printed, tagged or written into a run's config.

MLflow reads basic-auth credentials from MLFLOW_TRACKING_URI (`http://user:password@host`) and
cloud stores from signed URLs (`?token=...`, `?sig=...`); the tracking URI is part of the resolved
config, so without this it reached the params, config.yaml, report.html, the summary's "open:"
line and the Hydra log of every run.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://userinfo@ : everything between '//' and the last '@' before the host
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s'\"]+)@")
# ?name=value / &name=value where the name looks like a secret
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&\s'\"#]*(?:token|secret|password|passwd|pwd|sig|signature|key|credential|auth)"
    r"[^=&\s'\"#]*=)(?P<value>[^&\s'\"#]+)", re.I)


def redact(text: str) -> str:
    """`text` with every URI's user info and token-like query values replaced by ***."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_value(value):
    """Strings redacted, containers walked, anything else as it is (for configs turned into dicts)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


class RedactFilter(logging.Filter):
    """A handler filter: the formatted message with credentials masked (conf/hydra/default.yaml puts
    it on the console and file handlers; quiet.py on MLflow's own handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True

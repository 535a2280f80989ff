"""No password is stored or shown: a user:password in a URI flag is taken out of the URI before
anything keeps it (search.json, MLflow parameters, pickles, the summary), and handed to its client
through the environment variable that client reads. What has no such variable is refused.

    --mlflow-uri http(s)://USER:PASS@HOST   -> MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    --optuna-storage postgresql://USER:PASS@HOST/DB -> PGPASSWORD (libpq; ~/.pgpass works too)

A resumed search reads the password from the same variables again (set them, or ~/.pgpass).
"""
import os
from urllib.parse import unquote, urlsplit, urlunsplit

from drn.config import UsageError

ENV_HINT = {"--mlflow-uri": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
            "$MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
            "--optuna-storage": "PGPASSWORD or ~/.pgpass (PostgreSQL)"}


def _netloc(parts, user: bool) -> str:
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return (f"{parts.username}@" if user and parts.username else "") + host + port


def strip_password(flag: str, uri: str | None, environ=os.environ) -> str | None:
    """`uri` without its password, which goes to the variable its client reads (in `environ`, this
    process's: a local Ray's workers inherit it); a password no client variable can carry is refused."""
    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    try:
        password = parts.password
    except ValueError:   # a malformed port: the flag's own check says so
        return uri
    if password is None:
        return uri
    scheme = parts.scheme.split("+", 1)[0]
    if flag in ("--mlflow-uri", "$MLFLOW_TRACKING_URI") and scheme in ("http", "https"):
        environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
        return urlunsplit(parts._replace(netloc=_netloc(parts, user=False)))
    if flag == "--optuna-storage" and scheme == "postgresql":
        environ["PGPASSWORD"] = unquote(password)
        return urlunsplit(parts._replace(netloc=_netloc(parts, user=True)))
    where = f"give it through {ENV_HINT[flag]}" if flag in ENV_HINT else "give credentials through the environment"
    raise UsageError(f"{flag} holds a password, which would be stored and shown: {where}, not in the URI")

"""The peer comparison, opt-in: ``throughput.py --peers`` and ``inprocess.py --peers``.

fastapi-utils, fastapi-sqla, FastSQLA, fastapi-async-sqlalchemy and advanced-alchemy, each used
as its docs show (``apps/``), each from its own virtualenv (``setup_peers.py``, under
``.venvs/``, made on first use). With the peers on, ours, the baselines and bare run from the
``project`` virtualenv, so that every approach runs on the same Python.
"""

from __future__ import annotations

from harness import OWN_PYTHON, Approach, add_approaches

from peers import setup_peers
from peers.setup_peers import HERE, peer_status, venv_python

APPS = HERE / "apps"


def _peer(name: str, module: str, kind: str) -> Approach:
    return Approach(name, module, kind, app_dir=APPS, python=venv_python(name), peer=name)


APPROACHES = [
    _peer("fastapi-utils", "peer_fastapi_utils", "sync"),
    _peer("fastapi-sqla", "peer_fastapi_sqla", "sync"),
    _peer("fastsqla", "peer_fastsqla", "async"),
    _peer("fastapi-async-sqlalchemy", "peer_fastapi_async_sqlalchemy", "async"),
    _peer("advanced-alchemy", "peer_advanced_alchemy", "async"),
]


def enable(wanted: list[str] | None = None, *, force: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """Set up the virtualenvs that are missing (all with ``force``) and add the peers' approaches.

    ``wanted``: the approach names asked for (``None``: every peer); only their virtualenvs are
    made. Returns ``(skipped, notes)``: the peers whose virtualenv failed, and what setup noted
    about the others (both by approach name, for the tables).
    """
    chosen = [a for a in APPROACHES if wanted is None or a.name in wanted]
    names = ["project", *(str(a.peer) for a in chosen)]
    missing = [n for n in names if force or not venv_python(n).exists()]
    if missing:
        print(f"setting up peers: {', '.join(missing)}", flush=True)
        setup_peers.main([*missing, *(["--force"] if force else [])])
    if peer_status("project").get("ok"):
        OWN_PYTHON[0] = venv_python("project")
    else:
        print("project venv not available: ours, the baselines and bare run on this interpreter", flush=True)
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    for approach in chosen:
        status = peer_status(str(approach.peer))
        if not status.get("ok"):
            skipped[approach.name] = str(status.get("note", "not available"))
        elif status.get("note"):
            notes[approach.name] = str(status["note"])
    add_approaches([a for a in chosen if a.name not in skipped])
    return skipped, notes


def project_versions() -> dict[str, str]:
    """The versions ours, the baselines and bare run on in the ``project`` virtualenv."""
    return dict(peer_status("project").get("versions", {}))  # type: ignore[call-overload]


def versions(names: list[str]) -> dict[str, dict[str, str]]:
    """Each measured peer's versions, as its virtualenv reported them at setup."""
    out = {}
    for approach in APPROACHES:
        if approach.name in names:
            reported = peer_status(str(approach.peer)).get("versions")
            if reported:
                out[approach.name] = dict(reported)  # type: ignore[call-overload]
    return out

"""``bastion index rebuild`` while a server holds the archive: asks that server to rebuild its index online.

The server's HTTP API does the work (``POST /api/index/rebuild``, then ``GET`` for its progress:
:mod:`bastion.ingest.online_rebuild`); this command starts it, shows a progress bar and prints the summary line
of the offline rebuild. While the server switches the new index in it accepts no request for a moment: the
polling waits through that.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from tqdm import tqdm

from bastion.auth.local import local_token
from bastion.errors import BastionError
from bastion.ingest.online_rebuild import RebuildState, describe
from bastion.settings import Settings

#: How long the server may not answer (the switch restarts its processes) before the command gives up.
SILENCE_S = 300.0
#: Between two looks at the progress.
POLL_S = 0.5


def server_url(settings: Settings) -> str:
    """The running server's ``/api/index/rebuild`` URL, from the settings (a wildcard host is asked on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}/api/index/rebuild"


def _call(url: str, method: str, settings: Settings) -> tuple[int, dict[str, Any]]:
    """One request to the server; with ``[auth]`` on, it carries a node-local admin token (:mod:`bastion.auth.local`)."""
    headers = {"Accept": "application/json"}
    if settings.auth_enabled:
        headers["Authorization"] = f"Bearer {local_token(settings.data)}"
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": exc.reason}


def rebuild_online(settings: Settings) -> int:
    """Ask the server holding the archive in ``settings.data`` to rebuild its index, follow it, print the summary:
    0 once it is switched in, 1 if it failed. Raises BastionError if the server does not answer or refuses."""
    url = server_url(settings)
    try:
        code, body = _call(url, "POST", settings)
    except (OSError, ValueError) as exc:
        raise BastionError(f"the archive in {settings.data} is in use, and the server did not answer at {url} "
                           f"({getattr(exc, 'reason', exc)}): if the server listens elsewhere, give its `host` and "
                           "`http_port` (--config, BASTION_HOST, BASTION_HTTP_PORT); else stop what holds the archive "
                           "(a `bastion import`?) and try again") from None
    if code == 409:
        _, running = _call(url, "GET", settings)
        if not RebuildState.from_json(running).running:  # the index rebuilds itself (at start): not this
            raise BastionError(f"the server at {url} did not start the rebuild: {body.get('error', body)}")
        print(f"{body.get('error')}: following it", file=sys.stderr)
        body = running
    elif code != 202:
        raise BastionError(f"the server at {url} did not start the rebuild (HTTP {code}): "
                           f"{body.get('error', body)}")
    print(f"the archive is in use: the server at {url} rebuilds its index while it serves", file=sys.stderr)
    done = _follow(url, body.get("started"), RebuildState.from_json(body), settings)
    if done.state == "failed":
        print(f"the online rebuild failed: {done.error}", file=sys.stderr)
        return 1
    print(describe(done))
    caught_up = done.report.get("caught_up", 0)
    pause = f"; the server paused {done.pause_s:.2f} s to switch it in" if done.pause_s is not None else ""
    print(f"  {caught_up} object(s) stored during the rebuild indexed too{pause}")
    for key, reason in done.skipped:
        print(f"  skipped {key}: {reason}")
    return 0


def _follow(url: str, started: str | None, state: RebuildState, settings: Settings) -> RebuildState:
    """Poll the rebuild's state with a progress bar until it ends (:attr:`RebuildState.ended`; a rebuild switched in
    whose server has not said how long it paused within :data:`SILENCE_S` ends all the same)."""
    heard = time.monotonic()
    switched: float | None = None
    with tqdm(total=state.total, desc="rebuilding index", unit=" objects", file=sys.stderr, disable=None) as bar:
        while True:
            if state.started == started:  # not a rebuild before this one
                if state.total is not None and bar.total != state.total:
                    bar.reset(total=state.total)
                bar.update(max(0, state.done - bar.n))
                bar.set_postfix_str(state.state)
                if state.state == "done" and switched is None:
                    switched = time.monotonic()
                if state.ended or (switched is not None and time.monotonic() - switched > SILENCE_S):
                    return state
            time.sleep(POLL_S)
            try:
                state = RebuildState.from_json(_call(url, "GET", settings)[1])
                heard = time.monotonic()
            except (OSError, ValueError) as exc:  # the server is switching the index in: it answers again soon
                if time.monotonic() - heard > SILENCE_S:
                    raise BastionError(f"the server at {url} has not answered for {SILENCE_S:.0f} s "
                                       f"({getattr(exc, 'reason', exc)}): see its log") from None

"""Subject permissions that confine a NATS user to one Asman queue (deploy/nats/accounts).

    python deploy/nats/accounts/permissions.py worker:alpha client:alpha worker:beta
    python deploy/nats/accounts/permissions.py --nsc worker:alpha

prints, per ROLE:QUEUE, a NATS config variable (``WORKER_ALPHA = { publish …, subscribe … }``)
to reference as ``permissions: $WORKER_ALPHA``, or with ``--nsc`` the ``nsc add user`` command
that issues the same permissions in a JWT (a ``.creds`` file for ``asman --creds``).

The user it describes runs Asman with ``--reads consumer --inbox-prefix _INBOX.<user>``
(LogConfig reads="consumer", inbox_prefix): every read then names its queue in the request
*subject*, where these permissions can check it (asman/log/filtered.py). Everything not listed
is denied: listing streams, consumers or subjects, reading another queue, the payload-filtered
direct get, and other users' inboxes.

The permissions themselves are asman.log.permissions' (the auth callout of deploy/nats/public
grants the same), built from asman.log.subjects, so they follow the wire format; the
checked-in permissions.conf is this script's output, compared by
tests/federation/test_static.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from asman.log.permissions import Permissions, permissions


def conf_variable(p: Permissions) -> str:
    name = p.user.upper().replace("-", "_")
    lines = [f"{name} = {{", "  publish: { allow: ["]
    lines += [f"    {json.dumps(s)}" for s in p.publish]
    lines += ["  ] }", "  subscribe: { allow: ["]
    lines += [f"    {json.dumps(s)}" for s in p.subscribe]
    lines += ["  ] }", "}"]
    return "\n".join(lines)


def nsc_command(p: Permissions, account: str) -> str:
    args = ["nsc", "add", "user", "--account", account, "--name", p.user]
    for s in p.publish:
        args += ["--allow-pub", s]
    for s in p.subscribe:
        args += ["--allow-sub", s]
    return " ".join(shlex.quote(a) for a in args)


def render(specs: list[str], *, domain: str | None = None, nsc: str | None = None) -> str:
    out = []
    for spec in specs:
        role, _, queue = spec.partition(":")
        p = permissions(role, queue, domain=domain)
        out.append(nsc_command(p, nsc) if nsc else conf_variable(p))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", metavar="ROLE:QUEUE", help="worker:q or client:q")
    parser.add_argument("--domain", help="JetStream domain the user reaches (e.g. hub)")
    parser.add_argument("--nsc", metavar="ACCOUNT", help="print nsc commands for ACCOUNT")
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.specs, domain=args.domain, nsc=args.nsc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

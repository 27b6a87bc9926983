"""A program family ``setup`` for the loader tests (run in each loader child, after its maps are
made): the child checks in under ``$ENVELOPE_TEST_RENDEZVOUS`` and waits until
``$ENVELOPE_TEST_RENDEZVOUS_N`` children have, so a load succeeds only if the children ran at once."""

from __future__ import annotations

import os
import time


def meet(maps) -> None:
    where = os.environ["ENVELOPE_TEST_RENDEZVOUS"]
    want = int(os.environ.get("ENVELOPE_TEST_RENDEZVOUS_N", "2"))
    deadline = time.monotonic() + float(os.environ.get("ENVELOPE_TEST_RENDEZVOUS_WAIT", "60"))
    open(os.path.join(where, str(os.getpid())), "w").close()
    while len(os.listdir(where)) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(os.listdir(where))} of {want} loader children met")
        time.sleep(0.01)

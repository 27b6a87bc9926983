"""``envelope profile list`` and ``envelope profile show NAME``."""

from __future__ import annotations

from sensor.identity import UNRESOLVED_NAMESPACE
from sensor.store import ProfileStore, ProfileStoreError
from sensor.workload import SUBSTRATES

from ..errors import UserError
from ..output import add_output_option, emit, iso


def register(sub) -> None:
    p = sub.add_parser("profile", help="list and show recorded profiles")
    psub = p.add_subparsers(dest="profile_command", metavar="ACTION")
    psub.required = True
    lp = psub.add_parser("list", help="list workloads with a profile")
    add_output_option(lp)
    lp.set_defaults(func=cmd_list)
    sp = psub.add_parser("show", help="show one workload's profile")
    sp.add_argument("name", help="workload: name, namespace/name or namespace/kind/name/container")
    sp.add_argument("--substrate", choices=SUBSTRATES, help="only this substrate")
    add_output_option(sp)
    sp.set_defaults(func=cmd_show)


def resolve_one(store: ProfileStore, name: str):
    """The one workload ``name`` designates, or a clear error."""
    matches = store.find(name)
    if not matches:
        known = ", ".join(w.key for w in store.workloads()) or "none"
        raise UserError(f"no profile for workload {name!r} in {store.root} (known: {known})")
    if len(matches) > 1:
        raise UserError(f"{name!r} is ambiguous: {', '.join(w.key for w in matches)}; give the full key")
    return matches[0]


def load_profile(store: ProfileStore, name: str):
    workload = resolve_one(store, name)
    try:
        return store.load(workload)
    except ProfileStoreError as e:
        raise UserError(str(e)) from e


def cmd_list(args, config) -> int:
    store = ProfileStore(config.state_dir)
    items, rows = [], []
    for w in store.workloads():
        try:
            p = store.load(w)
        except ProfileStoreError as e:
            items.append({"workload": w.key, "error": str(e)})
            rows.append([w.key, "-", "-", "-", "-", "-", "error"])
            continue
        start, end = p.window()
        b = p.behaviours()
        loss = sum(p.loss().values())
        incomplete = sorted({s.meta["identity_incomplete"] for s in p.sessions()
                             if s.meta.get("identity_incomplete")})
        item = {"workload": w.key, "sessions": p.session_count, "behaviours": len(b),
                "window": {"start": start, "end": end}, "loss": p.loss(), "capped": p.capped}
        if w.namespace == UNRESOLVED_NAMESPACE:
            item["unresolved"] = incomplete or ["identity incomplete"]
        items.append(item)
        flags = ["capped"] if p.capped else []
        if "unresolved" in item:
            flags.append("unresolved: " + "; ".join(item["unresolved"]))
        rows.append([w.key, p.session_count, len(b), iso(start), iso(end), loss, ", ".join(flags)])
    emit(items, args.output, rows, ["workload", "sessions", "behaviours", "first", "last", "lost", "flags"])
    return 0


def cmd_show(args, config) -> int:
    p = load_profile(ProfileStore(config.state_dir), args.name)
    data = p.to_json()
    if args.substrate:
        data["behaviours"] = [b for b in data["behaviours"] if b["substrate"] == args.substrate]
    if args.output != "table":
        emit(data, args.output)
        return 0
    start, end = data["window"]["start"], data["window"]["end"]
    print(f"workload:   {p.workload.key}")
    print(f"window:     {iso(start)} .. {iso(end)}")
    print(f"sessions:   {data['sessions']['count']} ({data['sessions']['closed']} closed)")
    print(f"nodes:      {', '.join(data['nodes'])}")
    print(f"loss:       {data['loss'] or 'none'}")
    print(f"new in 24h: {data['coverage']['new_last_24h']}")
    if data["capped"]:
        print(f"CAPPED:     overflow {data['overflow']}")
    for k, vals in data["fingerprints"].items():
        print(f"fingerprint {k}: {', '.join(vals)}")
    print()
    rows = [[b["key"], b["substrate"], b["count"], b["sessions"], iso(b["first_seen"]), iso(b["last_seen"])]
            for b in data["behaviours"]]
    emit(None, "table", rows, ["behaviour", "substrate", "count", "sessions", "first seen", "last seen"])
    return 0

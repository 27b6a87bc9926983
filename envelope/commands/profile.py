"""``envelope profile list`` and ``envelope profile show NAME``."""

from __future__ import annotations

from sensor.identity import UNRESOLVED_NAMESPACE
from sensor.store import ProfileStore, ProfileStoreError
from sensor.workload import SUBSTRATES, Workload

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
        files = store.scan()
        for f in files:  # a damaged file of this workload says what is wrong with it
            if f.error and f.workload and _names(f.workload.key, name):
                raise UserError(f.error)
        known = ", ".join(sorted(f.workload.key for f in files if not f.error)) or "none"
        bad = sum(1 for f in files if f.error)
        more = f"; {bad} profile file(s) could not be read (envelope profile list)" if bad else ""
        raise UserError(f"no profile for workload {name!r} in {store.root} (known: {known}){more}")
    if len(matches) > 1:
        raise UserError(f"{name!r} is ambiguous: {', '.join(w.key for w in matches)}; give the full key")
    return matches[0]


def _names(key: str, name: str) -> bool:
    try:
        w = Workload.parse(key)
    except ValueError:
        return False
    return name in (w.key, w.name, f"{w.namespace}/{w.name}", f"{w.namespace}/{w.kind}/{w.name}")


def load_profile(store: ProfileStore, name: str):
    workload = resolve_one(store, name)
    try:
        return store.load(workload)
    except ProfileStoreError as e:
        raise UserError(str(e)) from e


def cmd_list(args, config) -> int:
    """Every workload with a profile; a file that cannot be used is a row of its own (with the
    reason) and never stops the listing, and quarantined files are listed after them."""
    store = ProfileStore(config.state_dir)
    items, rows = [], []
    for f in store.scan():
        p = None
        error = f.error
        if not error:
            try:
                p = store.load_path(f.path, store.layout.root)
            except ProfileStoreError as e:
                error = str(e)
        if p is None:
            key = f.workload.key if f.workload else None
            items.append({"workload": key, "file": str(f.path), "error": error})
            rows.append([key or f.path.name, "-", "-", "-", "-", "-", "unreadable: " + error])
            continue
        start, end = p.window()
        b = p.behaviours()
        loss = sum(p.loss().values())
        w = p.workload
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
    for q in store.quarantined():
        items.append({"workload": None, "file": str(q), "error": "quarantined"})
        rows.append([q.name, "-", "-", "-", "-", "-", f"quarantined in {q.parent}"])
    emit(items, args.output, rows, ["workload", "sessions", "behaviours", "first", "last", "lost", "flags"])
    return 0


def cmd_show(args, config) -> int:
    p = load_profile(ProfileStore(config.state_dir), args.name)
    data = p.to_json()
    if args.substrate:
        data["behaviours"] = [b for b in data["behaviours"] if b["substrate"] == args.substrate]
        data["refused"] = [r for r in data["refused"] if r["substrate"] == args.substrate]
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
    if data["refused"]:
        print()
        rows = [[r["key"], r["substrate"], r["count"], iso(r["first_seen"]), iso(r["last_seen"])]
                for r in data["refused"]]
        emit(None, "table", rows, ["refused (not behaviour)", "substrate", "count", "first seen", "last seen"])
    return 0

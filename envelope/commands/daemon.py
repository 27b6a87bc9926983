"""``envelope daemon``: node-wide observation (and enforcement) until SIGTERM."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("daemon", help="watch every cgroup on this node and keep profiles up to date")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default from config)")
    p.add_argument("--metrics-address", default=None,
                   help="address the metrics endpoint listens on (default from config: 127.0.0.1)")
    p.add_argument("--flush-interval", type=float, default=None, help="seconds between profile writes")
    p.set_defaults(func=cmd_daemon)


def cmd_daemon(args, config) -> int:
    from ..daemon import run

    config = config.replace("command line", metrics_port=args.metrics_port,
                            metrics_address=args.metrics_address, flush_interval=args.flush_interval)
    return run(config)

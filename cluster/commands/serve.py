"""`tandem serve`: a local Ray, a local redis-server unless one is configured, and the Serve application, until
Ctrl-C or SIGTERM, which drains the requests in flight and then shuts everything down in reverse order."""

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time

from cluster.config import cache_dir, from_args


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import required_cpus
    from cluster.deploy import DeployError, deploy, drain
    from cluster.redis_server import LocalRedis
    from cluster.serve_config import APP_NAME
    from workers.engine.lora_folder import read_folder
    from workers.engine.model_store import resolve_model
    from workers.engine.sampling_params import generation_config_defaults

    if not args.verbose:
        # Serve's own INFO lines on this console ("Started Serve", "Deleting app"): the lines below say the same.
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    config = from_args(args)  # a bad flag or file fails before anything starts
    for name, folder in config.lora_modules.items():  # and so does an adapter folder that is not one
        read_folder(name, folder)
    if config.lora_dir is not None and not os.path.isdir(config.lora_dir):
        print(f"tandem: error: lora_dir {config.lora_dir} is not a folder", file=sys.stderr)
        return 2
    # A GGUF model (the embedded one on a first start) converts here, its progress on this console, rather than
    # silently inside the application's build; that finds the folder then.
    model_dir = resolve_model(config.model, cache_dir())
    try:  # a generation_config.json the engine would refuse fails here too, naming the file
        recommended = generation_config_defaults(model_dir) if config.generation_config == "auto" else {}
    except ValueError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    redis = LocalRedis() if config.redis_url is None else None
    if redis is not None:
        config = dataclasses.replace(config, redis_url=redis.url)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        # Logical CPUs: ranks mostly wait on each other, so a laptop may reserve more than it has cores.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(required_cpus(config)) + 1), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=args.verbose)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # ray.init installed its own, which exits at once
        pools = "a prefill pool and a decode pool" if config.disaggregate else "a decode pool (unified mode)"
        served = f", served as {config.served_model_name!r}" if config.served_model_name else ""
        adapters = f", LoRA adapters {', '.join(config.lora_modules)}" if config.lora_modules else ""
        print(f"tandem: starting {pools} of {config.model} (tensor parallel size {config.tensor_parallel_size}"
              f"{served}{adapters})", file=sys.stderr)
        if recommended:
            print("tandem: a request that leaves them unset takes the model's generation_config.json values: "
                  f"{', '.join(f'{k}={v}' for k, v in recommended.items())} (--generation-config none turns this "
                  "off)", file=sys.stderr)
        try:
            deploy(config, progress=lambda replicas: print(f"tandem: replicas: {replicas}", file=sys.stderr,
                                                            flush=True))
        except DeployError as e:
            print(f"tandem: {e}", file=sys.stderr)
            return 1
        tls, scheme = ("TLS", "https") if config.api.tls_cert_file else ("plaintext", "http")
        key = ", API key required" if config.api.key else ""
        print(f"tandem: serving gRPC on {config.host}:{config.grpc_port} (tandem.v1.Generation, health, reflection; "
              f"{tls}{key}) and HTTP on {scheme}://{config.host}:{config.http_port} (OpenAI API under /v1, /health, "
              f"/metrics); KV events in {config.redis_url}; Ctrl-C stops", file=sys.stderr, flush=True)
        if config.api.allow_runtime_lora:
            print("tandem: LoRA adapters may be loaded while it runs: POST /v1/load_lora_adapter {lora_name, "
                  "lora_path}, /v1/unload_lora_adapter {lora_name}", file=sys.stderr, flush=True)
        # The pools' throughput lines go on through the drain, which is when an operator most wants to see them.
        stats_done = threading.Event()
        stats = threading.Thread(target=_log_stats_until, args=(stats_done, config.redis_url, args.log_stats_interval),
                                 name="tandem-stats", daemon=True)
        stats.start()
        stop.wait()
        print(f"tandem: draining: finishing the requests in flight (up to {config.drain_timeout_s:.0f} s) while "
              "new ones get UNAVAILABLE / 503", file=sys.stderr, flush=True)
        drain(config.drain_timeout_s)
        stats_done.set()
        stats.join()
        print("tandem: shutting down", file=sys.stderr)
        # Deleting the app stops its replicas gracefully; ray.shutdown then takes Serve's controller and proxy
        # with it. serve.shutdown() would kill the controller under its own calls and print them as failed tasks.
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
        if redis is not None:
            redis.stop()
    return 0


def _log_stats_until(stop: threading.Event, redis_url: str, interval_s: float) -> None:
    """Prints the pools' throughput and load every interval while they work, until `stop` is set."""
    from cluster.stats_log import StatsLog

    if interval_s <= 0:
        return
    stats = StatsLog(redis_url)
    unread = False  # whether the last read failed: an outage is told once as it begins and once as it ends
    while True:
        try:
            lines = stats.lines(time.monotonic())  # the first read is the baseline: no line
            if unread:
                lines.insert(0, "load reports readable again")
            unread = False
        except Exception as e:  # Redis away: the console misses lines, the cluster carries on
            lines = [] if unread else [f"no load reports ({type(e).__name__}: {e}); requests are served meanwhile, "
                                       "routed without fresh cache and load reports"]
            unread = True
        for line in lines:
            print(f"tandem: {line}", file=sys.stderr, flush=True)
        if stop.wait(interval_s):
            return

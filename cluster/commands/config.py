"""`tandem config render`: the Ray Serve config of a cluster config, as YAML on stdout.

    tandem config render > deploy/serve-config.yaml                        # the defaults (checked in)
    tandem config render --config my.yaml --redis-url redis://redis:6379/0 > serve.yaml && serve deploy serve.yaml
    tandem config render --kuberay -tp 2 --device cuda                     # the layout the Helm chart deploys

The config is validated first: a bad key or value fails with the field named, before anything is printed.
"""

import argparse
import sys

from cluster import config as cluster_config

HELP = "print the Ray Serve config (serve deploy / KubeRay serveConfigV2) of a cluster config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`parser` is the `config` command's; it gets the `render` subcommand with every cluster config flag."""
    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="config_command", required=True)
    render = sub.add_parser("render", help="print the Serve config as YAML (every cluster config flag applies)",
                            description="Prints the Ray Serve config that deploys the cluster config given by "
                                        "--config FILE and flags (flags win): one application, `tandem`, built by "
                                        "cluster.app:app_builder with the cluster config as its args.")
    render.add_argument("--kuberay", action="store_true",
                        help="the multi-node layout of the Helm chart: HTTP proxy and ingress replicas on the head "
                             "pod, each pool pinned to its worker group by a custom resource")
    cluster_config.add_arguments(render)


def run(args: argparse.Namespace) -> int:
    from cluster.serve_config import render_yaml

    config = cluster_config.from_args(args)  # a ConfigError reaches `tandem`'s handler: exit 2, field named
    sys.stdout.write(render_yaml(config, kuberay=args.kuberay))
    return 0

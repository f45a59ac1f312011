"""Command line of the streaming builders: build (or resume) a dataset directory, or show its progress.

    python -m dataset.streaming build --builder dataset.multimodal.vision_unified.VisionUnifiedBuilder \\
        --config-json '{"root": ..., ...}'      # what a StreamingDataModule starts in the background
    python -m dataset.streaming status DATASET_DIR

Exit codes of `build`: 0 when the dataset is complete (or another builder runs on it), 0 after SIGTERM
and 130 after SIGINT (stopped after a complete file: the same command resumes it), 2 for a bad source
file or config value (the message, without a traceback, is the last line of the log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from hydra.utils import get_class

from dataset.streaming.manifest import LOCK_FILE, read_manifest
from dataset.streaming.shards import BuilderBusyError, BuildInterrupted, StreamingDatasetBuilder
from utils.config.errors import ConfigError
from utils.signals import EXIT_CONFIG
from utils.storage.locks import is_locked

log = logging.getLogger("dataset.streaming.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset.streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or resume) a streaming dataset")
    build.add_argument("--builder", required=True, help="dotted path of a StreamingDatasetBuilder subclass")
    build.add_argument("--config-json", required=True, help="the builder's keyword arguments as JSON (with 'root')")
    build.add_argument("--rebuild", action="store_true", help="delete the directory's contents first")
    build.add_argument("--throttle-s", type=float, default=None, help="sleep after each batch file (testing)")
    status = sub.add_parser("status", help="print a dataset directory's progress")
    status.add_argument("root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "status":
        manifest = read_manifest(args.root)
        if manifest is None:
            print(f"{args.root}: no manifest")
            return 1
        rows = sum(c["rows"] for c in manifest["consolidated"])
        print(json.dumps({
            "complete": manifest["complete"], "batches_written": manifest["batches_written"],
            "examples_written": manifest["examples_written"], "consolidated_files": len(manifest["consolidated"]),
            "consolidated_rows": rows, "builder_alive": is_locked(os.path.join(args.root, LOCK_FILE)),
            "stats": manifest.get("stats"),
        }, indent=1))
        return 0

    builder_class = get_class(args.builder)
    if not issubclass(builder_class, StreamingDatasetBuilder):
        parser.error(f"--builder {args.builder} is not a StreamingDatasetBuilder")
    kwargs = json.loads(args.config_json)
    if args.throttle_s is not None:
        kwargs["throttle_s"] = args.throttle_s
    root = kwargs.pop("root")
    log.info("Dataset builder pid %d for %s", os.getpid(), root)
    try:
        builder_class(root, **kwargs).build(rebuild=args.rebuild)
    except BuilderBusyError as e:
        log.info("%s: nothing to do", e)
        return 0
    except BuildInterrupted as e:
        log.warning("%s; run it again to resume", e)
        return e.exit_code
    except ConfigError as e:  # a bad source file or config value: the message says what to fix
        log.error("%s", e)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())

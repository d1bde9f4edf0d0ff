"""Run mergekit 0.1.5 (the test oracle, LGPL-3.0, used not copied) on several configs at once.

Usage: python mergekit_oracle.py JOBS.json, where JOBS.json is a list of
{"config": "<path to yaml>", "out": "<folder>", "seed": 0}.  One process for all jobs, so the
(slow) import of mergekit is paid once.
"""

import json
import logging
import sys

logging.disable(logging.WARNING)


def main(path: str) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    for job in json.load(open(path)):
        with open(job["config"]) as f:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
        run_merge(cfg, job["out"], MergeOptions(quiet=True, random_seed=job.get("seed", 0),
                                                 write_model_card=False))


if __name__ == "__main__":
    main(sys.argv[1])

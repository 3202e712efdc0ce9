"""python run.py [group=option ...] [key=value ...] -- see README.md."""

import hydra
from omegaconf import DictConfig

from decdec.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from decdec.run import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    main()

"""Training the small HyperMoE transformer on a tokenized corpus: `hypermoe train` and `hypermoe.train.train`.

    config.py      TrainConfig, the presets, the learning-rate schedule
    data.py        the corpus (memmaps) and the windows of each update and evaluation
    objective.py   model, optimizer, loss, validation pass
    checkpoint.py  RUN_DIR/checkpoint, one-process and sharded formats
    strategy.py    one process or a torchrun job, chosen once before the loop
    loop.py        the one training loop, the log
    plot.py        PNG plots of runs' logs
    cli.py         `hypermoe train`, `hypermoe checkpoint`, `hypermoe plot`
"""

from hypermoe.train.checkpoint import (  # noqa: F401 (the names hypermoe.train has always had)
    load_checkpoint, load_checkpoint_sharded, save_checkpoint, save_checkpoint_sharded,
)
from hypermoe.train.config import (  # noqa: F401
    BALANCE_LOSSES, PRESETS, RUN_ENTRIES, SPLITS, TOKEN_DTYPES, RouterGradientWarning, TrainConfig, lr_at,
    model_config, router_gets_task_gradient, router_warning,
)
from hypermoe.train.data import Corpus, batch, eval_offsets, open_corpus, train_offsets  # noqa: F401
from hypermoe.train.loop import TrainResult, read_log, train
from hypermoe.train.objective import (  # noqa: F401
    HYPER_HEADS, build_model, build_optimizer, evaluate, load_init, total_loss,
)
from hypermoe.train.strategy import Distributed, SingleProcess, choose_strategy, start_distributed

__all__ = ["TrainConfig", "TrainResult", "PRESETS", "train", "evaluate", "open_corpus", "lr_at", "read_log",
           "router_gets_task_gradient", "RouterGradientWarning",
           "Distributed", "start_distributed", "SingleProcess", "choose_strategy"]

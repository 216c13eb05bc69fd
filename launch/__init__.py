"""Entry points: the programs that launchers start by path (`launch/train.py`) and that the
console scripts `xmc-train`, `xmc-predict`, `xmc-recover`, `xmc-prepare` and `xmc-bench` run."""

"""Process layout: the dp x mp grid, distributed start-up, and Horovod."""

import torch

# On 2 cores, one intra-op thread per process: oversubscribed threads made torch 9x slower (docs/architecture.md).
torch.set_num_threads(1)

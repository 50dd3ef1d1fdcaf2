"""How a model is split across ranks: process groups (``distributed``), which tokens each rank holds
(``layout``), the sequence-parallel attention modes (``ulysses``, ``ring``) installed on a model from outside
(``sequence_parallel``), and the DeepSpeed/ZeRO config with the batch arithmetic (``deepspeed_config``)."""

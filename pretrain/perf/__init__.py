"""What a run costs: FLOPs and MFU (``flops``), memory meters (``memory``) and the plan printed before any work
(``plan``)."""

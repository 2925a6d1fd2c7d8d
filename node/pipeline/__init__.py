"""The pipeline: the agent that routes microbatches, the stage runtime, the transports."""

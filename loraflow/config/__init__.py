"""Config models, one module per stage; `loraflow.config.pipeline.PipelineConfig` ties them together."""

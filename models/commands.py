"""The `student` commands that make and judge the student model (see `server.runtime.cli`)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "base-model": ("models.base_model", "convert (or reuse) the pretrained base, SmolLM2-135M-Instruct, offline"),
    "demo-model": ("models.demo", "build (or reuse) the demo student: the base with the shop's LoRA merged in"),
    "distill": (
        "models.distill.command",
        "training data from an OpenAI-compatible teacher: response, cot, multitask (resumable)",
    ),
    "dataset": ("models.dataset_check", "check a chat JSONL dataset for training and split it: student dataset check"),
    "train-lora": ("models.train_lora", "LoRA fine-tune a base model on chat JSONL (loss on assistant turns)"),
    "merge": ("models.merge", "merge a LoRA adapter into its base model and verify the result"),
    "eval": ("models.evaluation.command", "is the student good enough, at what price: held-out eval set, judge, cost"),
}

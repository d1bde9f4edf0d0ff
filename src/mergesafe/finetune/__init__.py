"""mergesafe.finetune."""

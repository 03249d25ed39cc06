"""What a sweep will cost before any GPU is spent: FLOPs counted on the model's architecture on
the meta device (no weights, offline), turned into GPU hours at a stated utilisation."""

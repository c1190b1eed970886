"""Phase timers, bytes moved and reports for the MoE data path."""

"""The MoE data path: router -> capacity -> permute -> all-to-all -> experts -> combine."""

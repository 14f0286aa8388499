"""One decode step of an MC-GDN layer core for a batch of sequences whose memory lives in pools."""

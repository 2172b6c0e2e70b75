"""Query and retrieval: one matching engine for C-FIND and QIDO-RS, one retrieval path for
C-MOVE, C-GET and WADO."""

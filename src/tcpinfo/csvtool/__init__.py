"""csvtool: archives to CSV, byte-identical to upstream's by default, or in a modern schema."""

"""What several test modules share: paths, the daemon, csvtool runs, saver files, messages."""

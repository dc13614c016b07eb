"""cvmfs-publisher consumer daemon."""

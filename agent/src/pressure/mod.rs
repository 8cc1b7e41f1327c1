//! Resource pressure from procfs/sysfs. (Being written.)

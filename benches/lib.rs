//! Ferry's benchmarks. `chunking` is criterion (chunkers and hashing);
//! `compare` runs real `ferry` processes beside b3sum, casync and rsync on
//! the same files. Results and the commands that reproduce them are in
//! BENCHMARKS.md.

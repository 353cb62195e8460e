//! Feature `mpi` only: compiles `src/in_place.c` (the value of the C macro `MPI_IN_PLACE`, which rsmpi's
//! bindings lack) with the same MPI that rsmpi's `mpi-sys` finds (`mpicc -show`, then pkg-config).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "mpi")]
    in_place();
}

#[cfg(feature = "mpi")]
fn in_place() {
    println!("cargo:rerun-if-changed=src/in_place.c");
    let lib = match build_probe_mpi::probe() {
        Ok(lib) => lib,
        Err(errs) => {
            let why: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            panic!("feature `mpi`: no MPI found (install e.g. libopenmpi-dev): {}", why.join("; "));
        }
    };
    let mut build = cc::Build::new();
    build.file("src/in_place.c");
    match lib.mpicc {
        Some(mpicc) => {
            build.compiler(mpicc);
        }
        None => {
            for dir in &lib.include_paths {
                build.include(dir);
            }
        }
    }
    build.compile("dist_in_place");
}

/* MPI_IN_PLACE for the Rust side: a C macro (Open MPI: (void *) 1, MPICH: (void *) -1) that rsmpi's generated
 * bindings do not carry, so it is read here, compiled with the MPI's own compiler wrapper (build.rs). */
#include <mpi.h>

void *dist_mpi_in_place(void) { return MPI_IN_PLACE; }

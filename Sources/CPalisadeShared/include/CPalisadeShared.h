/* Swift's view of the structures shared with the eBPF programs: the very
 * header the BPF objects are compiled with, not a copy. */
#include "../../../bpf/include/palisade_shared.h"

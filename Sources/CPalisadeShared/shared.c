/* Header-only module; SwiftPM needs one source file. */
#include "CPalisadeShared.h"

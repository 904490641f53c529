// Python module init of stattn._native: importing it loads the library, whose static initialisers
// register the stattn_native ops (torch.ops.stattn_native.*). The module itself is empty.
#include <Python.h>

static struct PyModuleDef stattn_native_module = {PyModuleDef_HEAD_INIT, "_native", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&stattn_native_module); }

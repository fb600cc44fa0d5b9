// The Python module prefix_attn._C. It holds no functions: importing it loads the shared
// library, whose static initialisers register the ops (torch.ops.prefix_attn.fwd / .bwd).
#include <Python.h>

static PyModuleDef prefix_attn_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "prefix_attn compiled ops (registered via "
                                           "TORCH_LIBRARY; use torch.ops.prefix_attn)",
                                           -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&prefix_attn_c_module); }

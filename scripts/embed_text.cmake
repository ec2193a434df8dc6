# Turns a text file into a C++ source defining qlora::demo_text() (a std::string_view over it).
file(READ ${INPUT} content HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${content}")
file(WRITE ${OUTPUT} "// Generated from ${INPUT}; do not edit.\n#include <string_view>\nnamespace qlora {\nstatic const unsigned char kDemoText[] = {${bytes} 0};\nstd::string_view demo_text() { return std::string_view(reinterpret_cast<const char*>(kDemoText), sizeof kDemoText - 1); }\n}\n")

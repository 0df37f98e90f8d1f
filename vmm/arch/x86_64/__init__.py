"""x86-64 specifics: guest physical layout, boot CPU state, CPUID, MP table."""

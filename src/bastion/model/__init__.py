"""Pure DICOM domain code: query levels, indexed attributes, matching rules. No I/O."""
